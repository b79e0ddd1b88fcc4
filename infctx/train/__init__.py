"""Training: LightningModule over the BPTT engine, data module over the samplers, LightningCLI entry point."""
