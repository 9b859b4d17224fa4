"""One module per load-test scenario; each has main(argv) (see loadtests/run.py)."""
