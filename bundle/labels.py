"""The class list: one declaration, used by data preparation, configs, metrics and serving.

Index order is alphabetical by HAM10000 ``dx`` code, as the network's output channels are.
"""

CLASS_NAMES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")

CLASS_LABELS = {
    "akiec": "actinic keratosis / intraepithelial carcinoma",
    "bcc": "basal cell carcinoma",
    "bkl": "benign keratosis-like lesion",
    "df": "dermatofibroma",
    "mel": "melanoma",
    "nv": "melanocytic nevus",
    "vasc": "vascular lesion",
}

NUM_CLASSES = len(CLASS_NAMES)

# actinic keratosis / intraepithelial carcinoma, basal cell carcinoma, melanoma: the triage answer
# (bundle.calibration) refers on their summed probability
MALIGNANT_CLASSES = ("akiec", "bcc", "mel")
