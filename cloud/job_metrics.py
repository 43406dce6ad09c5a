"""The training job's metric definitions: what SageMaker reads from the job's log to chart in its console.

SageMaker searches each line the job writes to stdout or stderr with every definition's regex and
records the first capture group as a float, with the line's time. The regexes match the two lines the
bundle logs for that purpose (``bundle/handlers.py``):

    ... bundle.handlers - INFO - epoch 3/30: train_loss 0.8123, train_s ..., val_auc 0.9012, validation_s ...
    ... bundle.handlers - INFO - evaluation on 1503 images: auc_macro 0.9321, accuracy 0.8011,
        balanced_accuracy 0.7412 (argmax: ...), ECE 0.0312; triage: malignant AUC 0.9102, refer at 0.1234:
        sensitivity 0.9500, specificity 0.6012; wrote ...

Both are anchored on their own wording, so that ignite's and MONAI's other lines (``Epoch[3] Metrics --
val_auc: ...``, ``Got new best metric of val_auc``) are not counted twice. A value the bundle prints as
``nan`` (an AUC of a split missing a class) matches nothing, so no point is recorded.
"""

NUMBER = r"([0-9]+(?:\.[0-9]+)?)"
EPOCH = r"epoch [0-9]+/[0-9]+: "
EVALUATION = r"evaluation on [0-9]+ images: "

# Name -> regex, in the order the console lists them; tests/test_sagemaker_production.py checks each
# against a real run's log.
METRICS = {
    "train:loss": EPOCH + r"train_loss " + NUMBER,
    "validation:auc": EPOCH + r".*\bval_auc " + NUMBER,
    "test:auc_macro": EVALUATION + r"auc_macro " + NUMBER,
    "test:accuracy": EVALUATION + r"auc_macro \S+, accuracy " + NUMBER,
    "test:balanced_accuracy": EVALUATION + r".*?, balanced_accuracy " + NUMBER,
    "test:ece": EVALUATION + r".*?\bECE " + NUMBER,
    "test:malignant_auc": EVALUATION + r".*?triage: malignant AUC " + NUMBER,
    "test:sensitivity": EVALUATION + r".*?triage: .*?sensitivity " + NUMBER,
    "test:specificity": EVALUATION + r".*?triage: .*?specificity " + NUMBER,
}


def metric_definitions() -> list:
    """``METRICS`` as the SDK's ``MetricDefinition`` objects, for ``ModelTrainer.with_metric_definitions``."""
    from sagemaker.core.training.configs import MetricDefinition

    return [MetricDefinition(name=name, regex=regex) for name, regex in METRICS.items()]
