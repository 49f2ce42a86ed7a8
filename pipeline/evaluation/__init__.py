"""Teacher against students: encoding, retrieval and zero-shot metrics, encoder cost, plots and the HTML report."""
