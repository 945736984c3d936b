"""Training, evaluation and export of pacsbridge's pneumonia model.

Imports :mod:`pacsbridge.model` for the shared preprocessing; pacsbridge never imports this.
"""
