"""The input corpus: manifests, the WebDataset reader, image decoding and views, and the synthetic world."""
