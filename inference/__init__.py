"""radfed.inference: the base layer.

Shared types and errors, DICOM series to volumes, the Orthanc REST client and launcher, synthetic
studies, and (later) preprocessing, task specs, model artifacts and runtimes. Imports nothing from the
other radfed packages.
"""
