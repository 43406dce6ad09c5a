"""SageMaker: the model directory an endpoint reads, the training container's contract (SM_* variables,
hyperparameters), and the checks that run before anything is uploaded to AWS.

Only ``cloud.aws`` imports the SageMaker SDK's dependencies (boto3); the rest needs the core install.
"""
