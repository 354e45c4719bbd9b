"""The demo: preparing the demo model (``model.py``) and running the demo job (``run.py``)."""
