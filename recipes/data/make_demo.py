"""Build recipes/data/demo.parquet from the CC0 / public-domain photos bundled with scikit-image."""

import io
from pathlib import Path

from datasets import Dataset, Features, Image, Value
from PIL import Image as PILImage
from skimage import data

OUT = Path(__file__).with_name("demo.parquet")
MAX_SIDE = 640
FEATURES = Features({"image": Image(), "caption": Value("string"), "source": Value("string")})

# (skimage.data function, caption that describes the photo)
MATCHING: list[tuple[str, str]] = [
    ("chelsea", "a close-up of a tabby cat with green eyes"),
    ("astronaut", "a smiling astronaut in an orange spacesuit in front of an American flag"),
    ("coffee", "a cup of espresso on a red saucer on a wooden table"),
    ("rocket", "a rocket on a launch pad at dusk between lightning towers"),
    ("camera", "a black and white photo of a man looking through a camera on a tripod"),
    ("hubble_deep_field", "a deep space telescope image full of distant galaxies"),
    ("retina", "a fundus photograph of a human retina with its blood vessels"),
    ("clock", "a motion-blurred black and white photo of a wall clock"),
    ("brick", "a black and white photo of a brick wall"),
    ("grass", "a black and white close-up of grass on the ground"),
    ("text", "handwritten mathematical formulas on a sheet of paper"),
]
# (skimage.data function, caption that does not describe the photo)
MISMATCHED: list[tuple[str, str]] = [
    ("chelsea", "a red sports car parked on a city street"),
    ("coffee", "a snowy mountain peak under a clear blue sky"),
    ("rocket", "a bowl of fresh fruit on a kitchen table"),
    ("camera", "two dogs playing on a sandy beach"),
]


def encode_jpeg(name: str) -> bytes:
    """Load ``skimage.data.<name>``, shrink it to at most MAX_SIDE px and encode it as JPEG."""
    img = PILImage.fromarray(getattr(data, name)())
    img.thumbnail((MAX_SIDE, MAX_SIDE), PILImage.Resampling.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def main() -> None:
    jpegs = {name: encode_jpeg(name) for name, _ in MATCHING}
    rows = MATCHING + MISMATCHED
    ds = Dataset.from_dict(
        {
            "image": [{"bytes": jpegs[name], "path": f"{name}.jpg"} for name, _ in rows],
            "caption": [caption for _, caption in rows],
            "source": [f"skimage.data.{name}" for name, _ in rows],
        },
        features=FEATURES,
    )
    ds.to_parquet(OUT)
    print(f"wrote {len(ds)} rows to {OUT}")


if __name__ == "__main__":
    main()
