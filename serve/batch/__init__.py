"""`python -m serve batch`: segment a whole cohort (a folder or ``s3://`` prefix of patients) with Ray Data.

A patient is a Kaggle-layout folder of TIFF/PNG slices, a NIfTI case or a DICOM study (serve.batch.scans:
masks as NIfTI on the scan's grid, a DICOM SEG for DICOM, the tumour volume in mL in patients.csv).
One row per patient (a volume is a few MB), so a patient's slices stay together and in order and the
bundle's 3D post-processing applies exactly as in `core evaluate` and `core predict`. Three stages stream through the
cluster: read and decode (CPU tasks) -> predict (an actor pool, each actor loading the bundle once,
on a GPU share when asked) -> encode, score and write (CPU tasks). Every patient is committed as a
unit with its ``patient.json`` record (serve.batch.store), so a rerun skips finished patients and
a crash loses none. An unreadable slice fails only its patient, named by file in the log and in
``summary.json``; the rest of the cohort completes.

Modules: ``plan`` (which patients a cohort holds), ``store`` (a local folder or ``s3://`` prefix),
``scans`` (NIfTI cases and DICOM studies), ``stages`` (read, predict, write: the Ray Data stages),
``report`` (patients.csv, summary.json), ``run`` (the driver) and ``cli`` (`python -m serve batch`).
"""
