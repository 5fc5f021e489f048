"""Deployment files vpool writes for other systems to run it.

kubernetes.py     `vpool deploy kubernetes`: the kustomize tree as files (layout, kustomization, writing)
fleet_objects.py  the objects every fleet has: Redis, controller, gateways, policies, monitors, config
workers.py        one worker Deployment per model, planned from the catalog and the planner
k8s_objects.py    what every object agrees on: images, ports, labels, Deployment and Service shapes
errors.py         DeployError, what `vpool deploy` refuses
"""
