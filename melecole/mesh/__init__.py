"""Neuroglancer meshes of a segmentation, block by block (``python -m melecole.mesh``; docs/meshes.md)."""

from melecole.mesh.core import MeshJob, MeshSummary, mesh_block, mesh_block_task, mesh_segmentation, storage_chunks

__all__ = ["MeshJob", "MeshSummary", "mesh_block", "mesh_block_task", "mesh_segmentation", "storage_chunks"]
