"""The files of a run folder, by name: the one place their spelling lives (the layout and what
each holds: :mod:`tuneflow.runs.folder`)."""
RUN = "run.json"  # status, recipe name, data fingerprint, timestamps, command line
RECIPE = "recipe.json"  # the resolved recipe
LABELS = "labels.json"  # class index -> name
METRICS = "metrics.csv"  # one row per epoch
REPORT = "report.json"
REPORT_MD = "report.md"
REPORT_HTML = "report.html"  # the self-contained page: tuneflow.runs.html
PREDICTIONS = "val_predictions.csv"  # the artifact's validation predictions
CURVES = "curves.png"
CONFUSION = "confusion.png"
CONFUSION_CSV = "confusion.csv"
TOP_LOSSES = "top_losses.png"
SAVEDMODEL = "model"  # the float32 SavedModel folder
KERAS = "model.keras"
BACKBONE_WEIGHTS = "backbone.weights.h5"
BACKBONE_JSON = "backbone.json"
CHECKPOINTS = "checkpoints"
TENSORBOARD = "tensorboard"
SEARCH_SUGGESTION = "suggest.json"  # a search of "auto": what `tuneflow suggest` answered
