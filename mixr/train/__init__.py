"""Training on the inference model code: the reasoning task suite, loss functions, pretraining/SFT."""
