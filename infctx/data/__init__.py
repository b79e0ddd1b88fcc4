"""Datasets: binidx files, tokenizers, the builder (`infctx data build`) and the training samplers."""
