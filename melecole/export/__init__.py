"""Exporting trained models: zoo entries, TorchScript / ONNX files and bioimage.io packages."""
