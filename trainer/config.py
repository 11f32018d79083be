"""The training configuration: the user-facing training settings plus the library's own.

Kept free of torch, so that the service can build and validate a configuration without
importing it (the training child does that).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated

import msgspec
from msgspec import Meta

from protocol.settings import TrainSettings, checked
from trainer.errors import UserError


class TrainConfig(TrainSettings, kw_only=True, forbid_unknown_fields=True):
    """The user-facing training settings (protocol.settings.TrainSettings: their defaults and
    bounds) plus the knobs only the library and its tests set. `pretrained` is the resolved
    folder to fine-tune; the service resolves pretrained_run_id / pretrained_path into it."""

    pretrained: str | None = None  # earlier run dir or local HF model dir: fine-tune it
    model_overrides: dict[str, int] = {}  # e.g. {"n_layer": 2}
    min_lr_ratio: Annotated[float, Meta(ge=0.0, le=1.0)] = 0.1  # cosine decays to lr * this
    # Validation/test batches per evaluation. A forward pass costs ~0.3 of a training step,
    # so 8 batches every eval_every=100 steps is ~2.5% of a run (20 batches cost 7.4%).
    eval_batches: Annotated[int, Meta(ge=1)] = 8
    keep_checkpoints: Annotated[int, Meta(ge=1)] = 2

    def fine_tunes(self) -> bool:
        return self.pretrained is not None or super().fine_tunes()

    def validate(self) -> None:
        """Bounds are checked when a config is decoded, not when it is built in code: check
        them here, then what the types cannot say."""
        try:
            checked(self)
        except msgspec.ValidationError as e:
            raise UserError(f"bad training option: {e}") from None
        self.check()  # the settings' rules across fields (FieldError names the field)
        if self.pretrained is None:  # a size the family lacks, a bad override: fail early
            from trainer.model import ModelConfig, model_dims

            model_dims(
                ModelConfig(
                    family=self.model_family,
                    size=self.model_size,
                    overrides=dict(self.model_overrides),
                )
            )


def load_config(values: Mapping[str, object]) -> TrainConfig:
    """A configuration from JSON-like values (a file, flags); a bad one is a UserError that
    names the field."""
    try:
        cfg = msgspec.convert(dict(values), TrainConfig)
    except msgspec.ValidationError as e:
        raise UserError(f"bad training option: {e}") from None
    cfg.validate()
    return cfg
