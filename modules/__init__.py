"""LightningModules of lightning-edit."""
