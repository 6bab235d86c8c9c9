"""The published ZAYA1-8B reference files that the repository ships (modeling_tests/reference/, see its README)."""

from pathlib import Path

REFERENCE = Path(__file__).resolve().parent / "reference"
ZAYA1_8B_CONFIG = REFERENCE / "zaya1-8b.config.json"
ZAYA1_8B_LEGACY_CONFIG = REFERENCE / "zaya1-8b-legacy.config.json"
ZAYA1_8B_KEYS = REFERENCE / "zaya1-8b.keys.tsv"


def zaya1_8b_tensor_shapes() -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor stored in the ZAYA1-8B checkpoint (a `key<TAB>[d0, d1]` table)."""
    shapes = {}
    for line in ZAYA1_8B_KEYS.read_text().splitlines()[1:]:
        name, shape = line.split("\t")
        shapes[name] = tuple(int(x) for x in shape.strip("[]").split(",") if x.strip())
    return shapes
