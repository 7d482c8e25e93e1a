"""The coordinator: the Flower ServerApp and its durable checkpoint."""
