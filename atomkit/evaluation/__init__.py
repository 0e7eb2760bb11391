"""Evaluation: `atomkit eval` (annotation files, retrieval and caption metrics, the development set) and
quantized/exported-vs-fp32 parity."""
