"""The correction store of the annotation app and its export to training files.

    store = AnnotationStore("data/annotations")            # DATA_DIR/annotations.sqlite
    mention_id = store.record_mention(mention)
    store.record_predictions(mention_id, [gemel_result, dim_result], kb="demo.sqlite")
    ack = store.record_correction("alice", mention_id, "Q42", "accept_dim")   # committed when returned
    store.undo_last("alice")
    export_corrections(store, "exports/run1", format="jsonl", kb=kb)
    export_corrections(store, "exports/team", format="parquet", project="wikimel-dev", min_agreement=0.5)
    compute_agreement(store, "wikimel-dev").table()          # kappa per pair, Krippendorff's alpha
    ReviewQueue(store, "wikimel-dev", reviewer="rita", is_reviewer=True).items()
    dashboard_data(store, "wikimel-dev"); figures(data)      # annotations.dashboard
    store.restore("backups/annotations-2025-01-01.sqlite")   # safe while the app runs
"""
from .agreement import AgreementReport, compute_agreement
from .export import FORMATS, ExportReport, export_corrections
from .review import ReviewQueue, TaskLabel, task_labels
from .store import (
                    ACTIONS,
                    SCHEMA_VERSION,
                    Ack,
                    AnnotationStore,
                    AnnotationStoreError,
                    NotAllowedError,
                    mention_key,
                    restore_database,
)

__all__ = ["ACTIONS", "Ack", "AnnotationStore", "AnnotationStoreError", "NotAllowedError", "SCHEMA_VERSION",
           "FORMATS", "ExportReport", "export_corrections", "mention_key", "restore_database",
           "AgreementReport", "compute_agreement", "ReviewQueue", "TaskLabel", "task_labels"]
