"""LightningDataModules of lightning-edit."""
