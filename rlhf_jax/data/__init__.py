"""Files to batches: text, demonstrations, comparisons, conversations and the tokenizers."""
