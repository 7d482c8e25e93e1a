"""DICOM in: series headers and frames, volumes with exact affines, resampling, SEG reading, series selection, and where
a study's instances come from."""
