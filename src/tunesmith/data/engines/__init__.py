"""Engines that run the steps over a whole source: the local stream (``stream``, kept and set-aside rows
written as they come by ``outputs``) and Ray (``ray_engine`` the driver, ``ray_read`` and ``ray_parts`` what
the workers run). May import every other room of data except ``profile`` and ``prepare``."""
