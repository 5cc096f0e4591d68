"""The network's part of the config: the model keys of the reference study's YAML, validated once
into a frozen :class:`ModelConfig` (defaults = the reference's ``config_hier.yaml``)."""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["ModelConfig"]

_CHOICES: dict[str, tuple[str, ...]] = {
    "magnification": ("x5_x20", "x5", "x20"),
    "emb_x5_backbone": ("conv1d",),
    "emb_x20_backbone": ("capool", "avgpool", "gapool"),
    "tra_backbone": ("Transformer", "Nystromformer"),
    "join": ("post", "pre"),
    "fusion": ("fusion", "cat"),
    "pool": ("gap", "mean", "max", "max_mean"),
    "capool_backend": ("auto", "triton", "torch"),
}


def _key_error(key: str, msg: str) -> ValueError:
    return ValueError(f"model config key {key!r}: {msg}")


def _as_int(key: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _key_error(key, f"expected an integer, got {value!r}")
    if value < minimum:
        raise _key_error(key, f"expected an integer >= {minimum}, got {value}")
    return value


def _as_bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise _key_error(key, f"expected true or false, got {value!r}")


def _parse_dims(value: Any) -> tuple[int, int, int, int]:
    if isinstance(value, str):
        parts: list[Any] = value.split("-")
        try:
            parts = [int(p) for p in parts]
        except ValueError:
            raise _key_error(
                "dims", f"expected 4 integers like '1024-384-384-4', got {value!r}"
            ) from None
    elif isinstance(value, (list, tuple)):
        parts = list(value)
    else:
        raise _key_error("dims", f"expected a string like '1024-384-384-4' or a list, got {value!r}")
    if len(parts) != 4:
        raise _key_error("dims", f"expected 4 sizes (input-embedding-hidden-output), got {value!r}")
    return tuple(_as_int("dims", p) for p in parts)  # type: ignore[return-value]


@dataclass(frozen=True)
class ModelConfig:
    """The model part of the reference config; defaults are those of ``config_hier.yaml``.

    ``tra_ksize``, ``tra_dw_conv`` and ``tra_epsilon`` are accepted for config compatibility;
    the two Transformer backbones offered here do not use them.
    """

    dims: tuple[int, int, int, int] = (1024, 384, 384, 4)
    magnification: str = "x5_x20"
    emb_x5_backbone: str = "conv1d"
    emb_x5_ksize: int = 5
    emb_x20_backbone: str = "capool"
    emb_x20_dw_conv: bool = False
    emb_x20_ksize: int = 3
    tra_position_emb: bool = True
    tra_backbone: str = "Transformer"
    tra_nhead: int = 8
    tra_num_layers: int = 1
    tra_ksize: int = 3
    tra_dw_conv: bool = False
    tra_epsilon: float = 0.8
    join: str = "post"
    fusion: str = "fusion"
    pool: str = "gap"
    dropout: float = 0.6
    capool_backend: str = "auto"

    @classmethod
    def yaml_keys(cls) -> frozenset[str]:
        """The config keys this class reads (the training config rejects keys nobody reads)."""
        return frozenset(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelConfig:
        """Read the model keys of a reference-style config mapping; other keys are ignored.

        Raises:
            ValueError: naming the key, when a value has the wrong type or is out of range.
        """
        kw = {k: d[k] for k in cls.yaml_keys() if k in d and d[k] is not None}
        return cls(**kw)

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalise once, here
        set_(self, "dims", _parse_dims(self.dims))
        for key, choices in _CHOICES.items():
            value = getattr(self, key)
            if value not in choices:
                raise _key_error(key, f"expected one of {', '.join(choices)}; got {value!r}")
        for key in ("emb_x5_ksize", "emb_x20_ksize", "tra_nhead", "tra_num_layers", "tra_ksize"):
            set_(self, key, _as_int(key, getattr(self, key)))
        for key in ("emb_x20_dw_conv", "tra_position_emb", "tra_dw_conv"):
            set_(self, key, _as_bool(key, getattr(self, key)))
        for key in ("dropout", "tra_epsilon"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise _key_error(key, f"expected a number, got {value!r}")
            set_(self, key, float(value))
        if not 0.0 <= self.dropout < 1.0:
            raise _key_error("dropout", f"expected a probability in [0, 1), got {self.dropout}")
        if self.emb_x5_ksize % 2 == 0:
            raise _key_error("emb_x5_ksize", f"expected an odd kernel size, got {self.emb_x5_ksize}")
        if self.emb_x20_ksize not in (1, 3):
            raise _key_error("emb_x20_ksize", f"expected 1 or 3, got {self.emb_x20_ksize}")
        _, emb, hid, _ = self.dims
        if emb != hid:
            # the encoders keep their width: the reference's layers after them are sized by
            # dims[2], so any other value cannot run
            raise _key_error("dims", f"embedding and hidden sizes must be equal, got {emb} and {hid}")
        if emb % 4:
            raise _key_error("dims", f"embedding size must be a multiple of 4 (sin-cos PE, 4 CAPool "
                        f"heads), got {emb}")
        if self.tra_position_emb and emb < 8:
            raise _key_error("dims", f"embedding size must be >= 8 for the sin-cos PE, got {emb}")
        if self.d_model % self.tra_nhead:
            raise _key_error("tra_nhead", f"{self.tra_nhead} heads do not divide the encoder width "
                        f"{self.d_model}")

    @property
    def dual(self) -> bool:
        return self.magnification == "x5_x20"

    @property
    def d_model(self) -> int:
        """Width of the Transformer encoder(s)."""
        if self.dual and self.join == "pre" and self.fusion == "cat":
            return 2 * self.dims[1]
        return self.dims[1]

    @property
    def enc_dim(self) -> int:
        """Width of the pooled patch features."""
        if self.dual and self.join == "post" and self.fusion == "cat":
            return 2 * self.dims[2]
        return self.d_model

    @property
    def cox(self) -> bool:
        """True when the output is one Cox risk score, False for discrete-time hazards."""
        return self.dims[3] == 1

    @property
    def needs_x5(self) -> bool:
        return self.magnification != "x20" or self.emb_x20_backbone == "capool"

    @property
    def needs_x20(self) -> bool:
        return self.magnification != "x5"
