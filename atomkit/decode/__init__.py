"""Decoding: the engine (greedy and beam search over steppers), its Llama steppers and packed-weight store,
grounded captions and structured assembly scripts."""
