"""radfed.inference: the base layer, shared by the node, the federation and the DICOM writers.

Its rooms: ``dicom`` (DICOM in: headers, volumes, SEG reading, series selection, study sources), ``orthanc`` (the
REST client), ``model`` (task specs, plan, recipe, artifacts, registry, ONNX runtime), ``pipeline`` (one study's
clinical inference) and ``testing`` (synthetic studies and an Orthanc launcher, never imported by clinical code).
Imports nothing from the other radfed packages.
"""
