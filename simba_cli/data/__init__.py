"""Text: the embedded corpus and a user's data, token streams, the BPE tokenizer trainer."""
