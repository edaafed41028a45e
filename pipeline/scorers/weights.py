"""Where a scorer's weights come from: a local file or folder, or the Hugging Face hub
(downloaded into its cache the first time, as `hf_hub_download` and `from_pretrained` do).
A failure names the setting to point at a local copy."""

from __future__ import annotations

from pathlib import Path

from pipeline.hps_model import ModelLoadError


def env_name(setting: str) -> str:
    """The environment variable of a setting ("scorers.clip_model")."""
    return "HPS_" + "__".join(part.upper() for part in setting.split("."))


def offline_hint(spec: str, setting: str, exc: BaseException) -> ModelLoadError:
    return ModelLoadError(
        f"{setting}: {spec!r} is neither a local path nor in the Hugging Face cache, and it "
        f"could not be downloaded ({type(exc).__name__}: {str(exc)[:200]}). Copy the weights "
        f"to this machine and set {setting} ({env_name(setting)}) to their path."
    )


def weights_file(spec: str, setting: str) -> Path:
    """A local file, or a file on the hub given as `owner/repo/path/in/repo`."""
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    parts = spec.split("/")
    if path.exists() or len(parts) < 3 or spec.startswith(("/", ".", "~")):
        raise ModelLoadError(
            f"{setting}: no such file {spec!r} (give a local file, or a hub file as "
            "owner/repo/filename)"
        )
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download("/".join(parts[:2]), "/".join(parts[2:])))
    except Exception as exc:  # offline, unknown repo or file, no permission
        raise offline_hint(spec, setting, exc) from None


def pretrained(loader: type, spec: str, setting: str) -> object:
    """`loader.from_pretrained(spec)` (a transformers class), with the setting named when
    it cannot load."""
    if spec.startswith(("/", ".", "~")) and not Path(spec).expanduser().is_dir():
        raise ModelLoadError(f"{setting}: no such folder {spec!r}")
    try:
        return loader.from_pretrained(spec)  # type: ignore[attr-defined]
    except (OSError, ValueError) as exc:
        raise offline_hint(spec, setting, exc) from None
