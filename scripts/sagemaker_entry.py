"""The SageMaker training job's entry script: train the bundle on the 'training' channel and leave a
deployable model in SM_MODEL_DIR.

    python scripts/sagemaker_entry.py [--epochs 30 --image_size "[64,64]" --batch_size 64 ...]

Hyperparameters arrive as ``--key value`` (SM_HPS too): ``epochs``, any bundle override
(``image_size``, ``batch_size``, ``learning_rate``, ``imbalance``, ``augment#prob``, ...), and the job's
``val_frac``, ``test_frac``, ``split_seed``, ``evaluate``; an unknown key is refused before any work.
Runs as one process, or under torchrun (the SDK's ``torchrun_driver.py``) as one of many, on every
GPU of every host, only rank 0 writing. Started by hand, it needs SM_MODEL_DIR, SM_OUTPUT_DATA_DIR and
SM_CHANNEL_TRAINING. See ``cloud/training_job.py``.
"""

import os
import sys

from cloud.training_job import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], dict(os.environ)))
