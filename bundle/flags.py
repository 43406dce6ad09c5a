"""Config flags that may arrive from the command line as text (``--resume false``)."""


def as_bool(value: bool | str, key: str) -> bool:
    """``value`` as a bool; text other than true/false/1/0/yes/no is an error naming config key ``key``."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise ValueError(f"config key {key!r} must be true or false, got {value!r}")
