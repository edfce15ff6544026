"""Neural-network building blocks shared by the models: norms, embeddings, attention, blocks."""
