"""radfed.federation: Flower ServerApp/ClientApp, local training, differential privacy, aggregation."""
