"""Using a run: the portable artifact (model.keras, model/ SavedModel, labels.json) and the Predictor that loads it."""
