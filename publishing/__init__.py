"""Publishing: what a published version holds and how it is shown. No Prefect.

    version.py   the files of a new version, written into its staging folder (weights, metrics,
                 lineage, report and figures, data checks, drift reference, model card)
    report.py    report.md and its figures (learning curves, confusion matrix)
    card.py      the model card, and the trend of every version of a model
    onnx.py      a version exported as ONNX, checked in onnxruntime against NumPy

The registry (``storage.registry``) allocates the version and commits the folder; the
``publish`` task (``tasks.model``) gathers what it needs and logs; this package decides what
goes into the folder and how it reads.
"""
