"""Deployment: torchao quantization, ExecuTorch export and its private-API patches, .pte programs and their
host runtime, and phones over adb."""
