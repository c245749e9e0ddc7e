"""The Cilium policy model (cilium.io/v2 CiliumNetworkPolicy / CiliumClusterwideNetworkPolicy):
parse, validate, match. Shared by ``dnsproxy`` (enforcement) and ``flowtel policy suggest``
(which checks that what it writes parses here).

Modules: ``names`` (FQDN selectors, RE2), ``selectors`` (label selectors), ``ports``
(``toPorts``, ``icmps``), ``rules`` (egress rules and rule-shape validation), ``policy``
(documents), ``pods`` (pods and the pods file), ``endpoints`` (the cluster's identities),
``policyset`` (the questions the proxy and the datapath ask).
"""
from flowtel.lib.policy.endpoints import EndpointIndex
from flowtel.lib.policy.errors import PolicyError
from flowtel.lib.policy.names import (MAX_FQDN_LENGTH, FqdnSelector, is_dns_name, normalize_name,
                                      parse_fqdn_selector)
from flowtel.lib.policy.pods import Labels, Pod, cilium_labels, load_node_addresses, load_pods
from flowtel.lib.policy.policy import API_VERSION, KINDS, LoadResult, Policy, Spec, load_policy_dir, parse_policy
from flowtel.lib.policy.policyset import CidrEntry, NodeAddresses, PolicySet
from flowtel.lib.policy.ports import ALL_PORTS, CILIUM_MAX_PORTS, DNS_PORT, L4, MAX_PORTS, PortRange, PortRule
from flowtel.lib.policy.rules import ENTITIES, CidrRule, EgressRule, IPNetwork
from flowtel.lib.policy.services import Service, ServicePort, load_services, service_from_spec
from flowtel.lib.policy.selectors import (NAMESPACE_LABEL, NAMESPACE_LABELS_PREFIX, SERVICE_ACCOUNT_LABEL,
                                          Requirement, Selector, parse_selector)

__all__ = [
    "ALL_PORTS", "API_VERSION", "CILIUM_MAX_PORTS", "DNS_PORT", "ENTITIES", "KINDS", "MAX_FQDN_LENGTH", "MAX_PORTS",
    "NAMESPACE_LABEL", "NAMESPACE_LABELS_PREFIX", "SERVICE_ACCOUNT_LABEL", "CidrEntry", "CidrRule", "EgressRule",
    "EndpointIndex", "FqdnSelector", "IPNetwork", "L4", "Labels", "LoadResult", "NodeAddresses", "Pod", "Policy",
    "PolicyError", "PolicySet", "PortRange", "PortRule", "Requirement", "Selector", "Service", "ServicePort", "Spec",
    "cilium_labels", "load_services", "service_from_spec",
    "is_dns_name", "load_node_addresses", "load_pods", "load_policy_dir", "normalize_name", "parse_fqdn_selector", "parse_policy",
    "parse_selector",
]
