"""The dataset-protocol options that fine-tuning and the label-efficiency study share (one
definition, so a study hands its runs exactly the options fine-tuning takes). Evaluation has
its own copies: each of its options defaults to the checkpoint's."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from cxrfast.data import label_formats
from cxrfast.data.label_formats import UNCERTAIN_HELP, VOTES
from cxrfast.data.labels import FORMATS

from . import labelled
from .config import opt


@dataclass
class DatasetOptions:
    label_format: str = opt("auto", label_formats.help_text(), choices=FORMATS)
    uncertain: str = opt("ones", f"CheXpert/MIMIC {UNCERTAIN_HELP}")
    label_set: Optional[str] = opt(None, labelled.HELP["label_set"])
    labels_map: Optional[str] = opt(None, labelled.HELP["labels_map"])
    split_files: Optional[tuple[str, ...]] = opt(None, labelled.HELP["split_files"])
    test_labels: Optional[str] = opt(None, labelled.HELP["test_labels"])
    view: Optional[str] = opt(None, labelled.HELP["view"])
    rad_vote: str = opt("majority", labelled.HELP["rad_vote"], choices=VOTES)

    def validate(self) -> None:
        """The options' syntax (per-label policies, label sets, maps, views), then the next
        config class's own checks."""
        labelled.check_options(self.uncertain, self.label_set, self.labels_map, self.view)
        parent = getattr(super(), "validate", None)
        if callable(parent):
            parent()
