"""PyTorch Lightning callbacks for asyncmomentum."""
