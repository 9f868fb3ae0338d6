"""tagflow: train and ship a multi-label image tagger on Airflow and SageMaker, or on one machine."""

__version__ = "0.1.0"
