"""vcon-fx: Vanishing Contributions compression as torch.fx graph passes."""
