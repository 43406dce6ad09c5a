"""Write a small synthetic HAM10000-shaped dataset for tests and smoke runs.

python scripts/make_synthetic.py --output_dir data/synthetic [--n_images 1400 --image_size "[200,150]" --seed 0]
"""

import sys

import fire

from bundle.synthetic import generate


def main(output_dir: str, n_images: int = 1400, image_size: tuple = (200, 150), seed: int = 0) -> None:
    """Generate ``n_images`` images of ``image_size`` (width, height) into ``output_dir``."""
    try:
        path = generate(output_dir, n_images=n_images, image_size=tuple(image_size), seed=seed)
    except (FileExistsError, ValueError) as error:  # a foreign folder, or arguments out of range
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {n_images} synthetic images to {path}")


if __name__ == "__main__":
    fire.Fire(main)
