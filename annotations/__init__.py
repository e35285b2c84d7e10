"""The correction store of the annotation app and its export to training files.

    store = AnnotationStore("data/annotations")            # DATA_DIR/annotations.sqlite
    mention_id = store.record_mention(mention)
    store.record_predictions(mention_id, [gemel_result, dim_result], kb="demo.sqlite")
    ack = store.record_correction("alice", mention_id, "Q42", "accept_dim")   # committed when returned
    store.undo_last("alice")
    export_corrections(store, "exports/run1", format="jsonl", kb=kb)
    store.restore("backups/annotations-2025-01-01.sqlite")   # safe while the app runs
"""
from .export import FORMATS, ExportReport, export_corrections
from .store import (ACTIONS, Ack, AnnotationStore, AnnotationStoreError, NotAllowedError, SCHEMA_VERSION,
                    mention_key, restore_database)

__all__ = ["ACTIONS", "Ack", "AnnotationStore", "AnnotationStoreError", "NotAllowedError", "SCHEMA_VERSION",
           "FORMATS", "ExportReport", "export_corrections", "mention_key", "restore_database"]
