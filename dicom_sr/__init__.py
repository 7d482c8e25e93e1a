"""radfed.dicom_sr: DICOM SEG and TID 1500 SR writing, and quality assurance of what is written."""
