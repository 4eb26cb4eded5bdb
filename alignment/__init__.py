"""alignment: Hydra-configured alignment of text-to-image diffusion models with human preferences."""

from pathlib import Path

from omegaconf import OmegaConf

__version__ = "0.1.0"

PACKAGE_DIR = Path(__file__).resolve().parent


def package_file(relative: str) -> str:
    """``${package_file:toy/captions/train.txt}`` in a config: the absolute path of a data file shipped inside the
    package (it works from any working directory and for an installed package); a one-line error if it is missing."""
    from alignment.errors import ConfigError

    path = PACKAGE_DIR / str(relative)
    if not path.is_file():
        raise ConfigError(f"package_file: {relative!r} is not a file of the alignment package ({PACKAGE_DIR})")
    return str(path)


if not OmegaConf.has_resolver("package_file"):
    OmegaConf.register_new_resolver("package_file", package_file)
