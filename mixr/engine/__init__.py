"""The serving engine. sequence, block_manager and scheduler are plain Python (no torch) and are tested alone."""
