"""Import location kept for ``zerovl_lightning.data.datamodule`` (``val_dataloader``): retrieval sets live in
:mod:`zerovl_lightning.eval.retrieval_data`, labelled sets in :mod:`zerovl_lightning.eval.classification_data`.
Remove once the datamodule imports :func:`resolve_retrieval_sets` from ``retrieval_data``."""

from zerovl_lightning.eval.retrieval_data import resolve_retrieval_sets

__all__ = ["resolve_retrieval_sets"]
