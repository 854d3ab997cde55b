"""Lightning tasks, data modules and run bookkeeping around the ``xconv`` layers."""
