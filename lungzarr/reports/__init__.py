"""What a person looks at: QC pictures of one patient (``qc``) and the cohort's
HTML report (``html``)."""
