"""CiliumNetworkPolicy / CiliumClusterwideNetworkPolicy (cilium.io/v2): the egress subset.

Parsing is strict: a key flowtel does not enforce (toEntities, toServices, egressDeny, named
ports, L7 HTTP rules, …) rejects the policy with a message naming it, because silently
ignoring part of a security policy would allow or deny something its author did not write.
Each policy file is independent: one invalid policy never stops the others.

Pods are plain data (:class:`Pod`); :class:`PolicySet` answers what the proxy and the
datapath loader ask: is this pod policed, may it resolve this name, which ports does an
answer for this name open, which CIDRs/endpoints may it reach. Only this node's pods are
policed, but ``toEndpoints`` selects among every pod of the cluster, as Cilium resolves it
against every identity: :class:`EndpointIndex` keeps those by identity (label set).
"""
from __future__ import annotations

import functools
import ipaddress
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

API_VERSION = "cilium.io/v2"
KINDS = ("CiliumNetworkPolicy", "CiliumClusterwideNetworkPolicy")
NAMESPACE_LABEL = "io.kubernetes.pod.namespace"
# Labels Cilium derives for every endpoint, which policies may select on.
NAMESPACE_LABELS_PREFIX = "io.cilium.k8s.namespace.labels."
SERVICE_ACCOUNT_LABEL = "io.cilium.k8s.policy.serviceaccount"
# Cilium label sources a selector may name; flowtel's pods only have Kubernetes labels.
_LABEL_SOURCES = ("k8s:", "any:")
_PROTOCOLS = {"TCP": 6, "UDP": 17, "SCTP": 132, "ANY": 0}
MAX_PORTS = 8  # FLOWTEL_FQDN_MAX_PORTS in bpf/flowtel.h

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
# A label set as a sorted tuple of pairs: hashable, so equal sets are one identity.
Labels = tuple[tuple[str, str], ...]


class PolicyError(ValueError):
    """A policy that cannot be enforced as written; the message names it and the key."""


@dataclass(frozen=True, slots=True)
class Pod:
    name: str
    namespace: str
    labels: dict[str, str]
    ips: tuple[str, ...]
    node: str = ""  # spec.nodeName; "" (a pods file without node keys): this node

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def selector_labels(self) -> dict[str, str]:
        return {**self.labels, NAMESPACE_LABEL: self.namespace}

    def identity(self) -> Labels:
        """The label set selectors see, as :class:`EndpointIndex` keys it."""
        return tuple(sorted(self.selector_labels().items()))

    def on_node(self, node: str) -> bool:
        """Whether the pod runs on ``node``; a pod or a proxy that names no node counts as local."""
        return not node or not self.node or self.node == node


# -- names -------------------------------------------------------------------------------

def normalize_name(name: str) -> str:
    """Lowercase, no trailing dot: how names are compared (DNS is case-insensitive)."""
    return name.strip().rstrip(".").lower()


_NAME_CHARS = re.compile(r"^[a-z0-9_*.-]+$")


_LABEL_CHARS = "[-a-z0-9_]"
# Cilium's multi-level prefix: `**.example.com` matches `a.example.com` and `a.b.example.com`,
# never `example.com` itself.
MULTI_LEVEL_PREFIX = "**."


@functools.lru_cache(maxsize=4096)
def _pattern_regex(pattern: str) -> re.Pattern[str]:
    # Cilium: `*` matches any run of characters valid in one label, never a dot.
    prefix = ""
    if pattern.startswith(MULTI_LEVEL_PREFIX):
        prefix, pattern = f"(?:{_LABEL_CHARS}+\\.)+", pattern[len(MULTI_LEVEL_PREFIX):]
    parts = [re.escape(p) for p in pattern.split("*")]
    return re.compile("^" + prefix + f"{_LABEL_CHARS}*".join(parts) + "$")


@dataclass(frozen=True, slots=True)
class FqdnSelector:
    match_name: str = ""
    match_pattern: str = ""

    def matches(self, name: str) -> bool:
        name = normalize_name(name)
        if self.match_name:
            return name == self.match_name
        if self.match_pattern == "*":
            return True
        return _pattern_regex(self.match_pattern).match(name) is not None


def parse_fqdn_selector(raw: Any, where: str) -> FqdnSelector:
    if not isinstance(raw, dict):
        raise PolicyError(f"{where}: expected a mapping with matchName or matchPattern")
    _only(raw, ("matchName", "matchPattern"), where)
    name, pattern = raw.get("matchName"), raw.get("matchPattern")
    if (name is None) == (pattern is None):
        raise PolicyError(f"{where}: exactly one of matchName and matchPattern is required")
    value = normalize_name(str(name if name is not None else pattern))
    if not value or not _NAME_CHARS.match(value) or ".." in value:
        raise PolicyError(f"{where}: {value!r} is not a DNS name or pattern")
    if name is not None:
        if "*" in value:
            raise PolicyError(f"{where}.matchName: {value!r} contains '*' (use matchPattern)")
        return FqdnSelector(match_name=value)
    rest = value[len(MULTI_LEVEL_PREFIX):] if value.startswith(MULTI_LEVEL_PREFIX) else value
    if "**" in rest or (value.startswith(MULTI_LEVEL_PREFIX) and not rest):
        raise PolicyError(f"{where}.matchPattern: {value!r}: '**' is only valid as a leading '**.' "
                          "(one or more subdomain labels, e.g. '**.example.com')")
    return FqdnSelector(match_pattern=value)


# -- label selectors ---------------------------------------------------------------------

def _label_key(key: str) -> str:
    for prefix in _LABEL_SOURCES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


@dataclass(frozen=True, slots=True)
class Requirement:
    key: str
    operator: str  # In, NotIn, Exists, DoesNotExist
    values: tuple[str, ...] = ()

    def matches(self, labels: dict[str, str]) -> bool:
        present = self.key in labels
        if self.operator == "In":
            return present and labels[self.key] in self.values
        if self.operator == "NotIn":
            return not present or labels[self.key] not in self.values
        if self.operator == "Exists":
            return present
        return not present


@dataclass(frozen=True, slots=True)
class Selector:
    """A Kubernetes label selector; empty selects everything."""

    requirements: tuple[Requirement, ...] = ()

    def matches(self, labels: dict[str, str]) -> bool:
        return all(r.matches(labels) for r in self.requirements)

    def names_key(self, key: str) -> bool:
        return any(r.key == key for r in self.requirements)


def parse_selector(raw: Any, where: str) -> Selector:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise PolicyError(f"{where}: expected a label selector mapping")
    _only(raw, ("matchLabels", "matchExpressions"), where)
    reqs: list[Requirement] = []
    labels = raw.get("matchLabels") or {}
    if not isinstance(labels, dict):
        raise PolicyError(f"{where}.matchLabels: expected a mapping of label to value")
    for k, v in labels.items():
        reqs.append(Requirement(_label_key(str(k)), "In", (str(v),)))
    exprs = raw.get("matchExpressions") or []
    if not isinstance(exprs, list):
        raise PolicyError(f"{where}.matchExpressions: expected a list")
    for i, e in enumerate(exprs):
        w = f"{where}.matchExpressions[{i}]"
        if not isinstance(e, dict) or "key" not in e or "operator" not in e:
            raise PolicyError(f"{w}: expected key and operator")
        _only(e, ("key", "operator", "values"), w)
        op = str(e["operator"])
        values = tuple(str(v) for v in (e.get("values") or []))
        if op in ("In", "NotIn") and not values:
            raise PolicyError(f"{w}: operator {op} needs values")
        if op in ("Exists", "DoesNotExist") and values:
            raise PolicyError(f"{w}: operator {op} takes no values")
        if op not in ("In", "NotIn", "Exists", "DoesNotExist"):
            raise PolicyError(f"{w}.operator: {op!r} is not In, NotIn, Exists or DoesNotExist")
        reqs.append(Requirement(_label_key(str(e["key"])), op, values))
    return Selector(tuple(reqs))


# -- ports -------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class PortRange:
    port: int  # 0 = any port
    end_port: int
    protocol: int  # IANA number; 0 = any


@dataclass(frozen=True, slots=True)
class L4:
    """Ports an allowance covers: every port, or a list of ranges."""

    any_port: bool
    ports: tuple[PortRange, ...] = ()

    @staticmethod
    def union(items: Iterable[L4]) -> L4 | None:
        items = list(items)
        if not items:
            return None
        if any(i.any_port for i in items):
            return ALL_PORTS
        ports: list[PortRange] = []
        for i in items:
            for p in i.ports:
                if p not in ports:
                    ports.append(p)
        return L4(False, tuple(ports))


ALL_PORTS = L4(True)


@dataclass(frozen=True, slots=True)
class PortRule:
    ports: tuple[PortRange, ...]
    dns: tuple[FqdnSelector, ...] | None  # None: no rules.dns


def _parse_port_rule(raw: Any, where: str) -> PortRule:
    if not isinstance(raw, dict):
        raise PolicyError(f"{where}: expected a mapping")
    _only(raw, ("ports", "rules"), where)
    ports: list[PortRange] = []
    for i, p in enumerate(raw.get("ports") or []):
        w = f"{where}.ports[{i}]"
        if not isinstance(p, dict) or "port" not in p:
            raise PolicyError(f"{w}: expected port (and optionally protocol, endPort)")
        _only(p, ("port", "protocol", "endPort"), w)
        try:
            port = int(str(p["port"]))
        except ValueError:
            raise PolicyError(f"{w}.port: named ports ({p['port']!r}) are not supported; use a number") from None
        end = int(p.get("endPort") or port)
        if not 0 <= port <= 65535 or not port <= end <= 65535 or (port == 0 and end != 0):
            raise PolicyError(f"{w}: port {port} / endPort {end} is not a valid range")
        proto_name = str(p.get("protocol", "ANY")).upper()
        if proto_name not in _PROTOCOLS:
            raise PolicyError(f"{w}.protocol: {proto_name!r} is not TCP, UDP, SCTP or ANY")
        ports.append(PortRange(port, end, _PROTOCOLS[proto_name]))
    if len(ports) > MAX_PORTS:
        raise PolicyError(f"{where}.ports: at most {MAX_PORTS} ports per rule are supported, got {len(ports)}")
    dns: tuple[FqdnSelector, ...] | None = None
    rules = raw.get("rules")
    if rules is not None:
        if not isinstance(rules, dict):
            raise PolicyError(f"{where}.rules: expected a mapping")
        unsupported = set(rules) - {"dns"}
        if unsupported:
            raise PolicyError(f"{where}.rules: only dns rules are supported, not {sorted(unsupported)}")
        if not isinstance(rules.get("dns"), list):
            raise PolicyError(f"{where}.rules.dns: expected a list")
        dns = tuple(parse_fqdn_selector(d, f"{where}.rules.dns[{i}]") for i, d in enumerate(rules["dns"]))
        if not all(p.port == 53 for p in ports) or not ports:
            raise PolicyError(f"{where}.rules.dns: DNS rules need toPorts port 53")
    return PortRule(tuple(ports), dns)


# -- rules and policies ------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class CidrRule:
    network: IPNetwork
    excepts: tuple[IPNetwork, ...] = ()


@dataclass(frozen=True, slots=True)
class EgressRule:
    to_fqdns: tuple[FqdnSelector, ...] = ()
    to_endpoints: tuple[Selector, ...] = ()
    to_cidrs: tuple[CidrRule, ...] = ()
    to_ports: tuple[PortRule, ...] = ()

    def l4(self) -> L4:
        ports = [p for r in self.to_ports for p in r.ports]
        return L4(False, tuple(ports)) if ports else ALL_PORTS

    def dns_selectors(self) -> tuple[FqdnSelector, ...]:
        return tuple(s for r in self.to_ports if r.dns is not None for s in r.dns)


_RULE_KEYS = ("toFQDNs", "toEndpoints", "toCIDR", "toCIDRSet", "toPorts")
_UNSUPPORTED_RULE_KEYS = ("toEntities", "toServices", "toGroups", "toRequires", "toNodes", "icmps",
                          "authentication", "toRequires")


def _parse_network(raw: Any, where: str) -> IPNetwork:
    try:
        return ipaddress.ip_network(str(raw), strict=False)
    except ValueError:
        raise PolicyError(f"{where}: {raw!r} is not a CIDR") from None


def _parse_egress_rule(raw: Any, where: str, namespace: str | None) -> EgressRule:
    if not isinstance(raw, dict):
        raise PolicyError(f"{where}: expected a mapping")
    for key in raw:
        if key in _UNSUPPORTED_RULE_KEYS:
            raise PolicyError(f"{where}.{key}: not supported by flowtel's FQDN policy")
    _only(raw, _RULE_KEYS, where)
    fqdns = tuple(parse_fqdn_selector(s, f"{where}.toFQDNs[{i}]") for i, s in enumerate(raw.get("toFQDNs") or []))
    endpoints = []
    for i, s in enumerate(raw.get("toEndpoints") or []):
        sel = parse_selector(s, f"{where}.toEndpoints[{i}]")
        # In a namespaced policy, endpoint selectors stay in its namespace unless they say otherwise.
        if namespace is not None and not sel.names_key(NAMESPACE_LABEL):
            sel = Selector(sel.requirements + (Requirement(NAMESPACE_LABEL, "In", (namespace,)),))
        endpoints.append(sel)
    cidrs = [CidrRule(_parse_network(c, f"{where}.toCIDR[{i}]")) for i, c in enumerate(raw.get("toCIDR") or [])]
    for i, c in enumerate(raw.get("toCIDRSet") or []):
        w = f"{where}.toCIDRSet[{i}]"
        if not isinstance(c, dict) or "cidr" not in c:
            raise PolicyError(f"{w}: expected cidr (and optionally except)")
        _only(c, ("cidr", "except"), w)
        net = _parse_network(c["cidr"], f"{w}.cidr")
        excepts = tuple(_parse_network(e, f"{w}.except[{j}]") for j, e in enumerate(c.get("except") or []))
        for e in excepts:
            if e.version != net.version or not e.subnet_of(net):  # type: ignore[arg-type]  # ip_network() is IPv4Network | IPv6Network; the versions are compared first
                raise PolicyError(f"{w}.except: {e} is not inside {net}")
        cidrs.append(CidrRule(net, excepts))
    ports = tuple(_parse_port_rule(p, f"{where}.toPorts[{i}]") for i, p in enumerate(raw.get("toPorts") or []))
    return EgressRule(fqdns, tuple(endpoints), tuple(cidrs), ports)


@dataclass(frozen=True, slots=True)
class Policy:
    kind: str
    name: str
    namespace: str | None  # None for a clusterwide policy
    selector: Selector
    egress: tuple[EgressRule, ...]
    polices_egress: bool  # default-deny egress for the pods it selects
    source: str

    @property
    def ref(self) -> str:
        ns = f"{self.namespace}/" if self.namespace else ""
        return f"{self.kind} {ns}{self.name} ({self.source})"

    def selects(self, pod: Pod) -> bool:
        if self.namespace is not None and pod.namespace != self.namespace:
            return False
        return self.selector.matches(pod.selector_labels())


def parse_policy(doc: Any, source: str) -> Policy:
    """One policy document; raises PolicyError naming the policy and the key."""
    if not isinstance(doc, dict):
        raise PolicyError(f"{source}: expected a policy object")
    kind, meta = doc.get("kind"), doc.get("metadata") or {}
    name = meta.get("name") if isinstance(meta, dict) else None
    label = f"{kind or '?'} {name or '?'} ({source})"
    if doc.get("apiVersion") != API_VERSION:
        raise PolicyError(f"{label}: apiVersion must be {API_VERSION}, got {doc.get('apiVersion')!r}")
    if kind not in KINDS:
        raise PolicyError(f"{label}: kind must be one of {', '.join(KINDS)}")
    if not name:
        raise PolicyError(f"{label}: metadata.name is required")
    namespace = None
    if kind == "CiliumNetworkPolicy":
        namespace = str(meta.get("namespace") or "default")
    if "specs" in doc:
        raise PolicyError(f"{label}: specs (several rules per policy) is not supported; write one policy per spec")
    spec = doc.get("spec")
    if not isinstance(spec, dict):
        raise PolicyError(f"{label}: spec is required")
    try:
        for key in ("egressDeny", "nodeSelector"):
            if key in spec:
                raise PolicyError(f"spec.{key}: not supported by flowtel's FQDN policy")
        _only(spec, ("endpointSelector", "egress", "ingress", "ingressDeny", "description", "labels",
                     "enableDefaultDeny"), "spec")
        if "endpointSelector" not in spec:
            raise PolicyError("spec.endpointSelector: required")
        selector = parse_selector(spec["endpointSelector"], "spec.endpointSelector")
        raw_egress = spec.get("egress")
        if raw_egress is not None and not isinstance(raw_egress, list):
            raise PolicyError("spec.egress: expected a list of rules")
        egress = tuple(_parse_egress_rule(r, f"spec.egress[{i}]", namespace) for i, r in enumerate(raw_egress or []))
        default_deny = (spec.get("enableDefaultDeny") or {}).get("egress", True)
    except PolicyError as exc:
        raise PolicyError(f"{label}: {exc}") from None
    return Policy(str(kind), str(name), namespace, selector, egress,
                  polices_egress=raw_egress is not None and bool(default_deny), source=source)


def _only(raw: dict[str, Any], allowed: Iterable[str], where: str) -> None:
    unknown = sorted(set(raw) - set(allowed))
    if unknown:
        raise PolicyError(f"{where}: unknown key(s) {', '.join(map(str, unknown))}")


@dataclass
class LoadResult:
    policies: list[Policy] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def load_policy_dir(directory: str | Path) -> LoadResult:
    """Every ``*.yaml``/``*.yml``/``*.json`` file (multi-document) in a directory.

    A bad document is reported and skipped; the rest still load.
    """
    out = LoadResult()
    for path in sorted(Path(directory).iterdir()):
        if path.suffix not in (".yaml", ".yml", ".json") or not path.is_file():
            continue
        try:
            docs = list(yaml.safe_load_all(path.read_text()))
        except (OSError, yaml.YAMLError) as exc:
            out.errors.append(f"{path}: cannot read: {exc}")
            continue
        for i, doc in enumerate(d for d in docs if d is not None):
            try:
                out.policies.append(parse_policy(doc, f"{path.name}#{i}"))
            except PolicyError as exc:
                out.errors.append(str(exc))
    return out


def load_pods(path: str | Path) -> list[Pod]:
    """The pods file: processors/k8sattributes' static source shape. Read here: ``pods:`` (name,
    namespace, ips, labels, node, service_account) and ``namespaces:`` (name, labels); other
    keys of that format are ignored. Pods get the labels Cilium derives, as with ``--kube``:
    ``io.cilium.k8s.policy.serviceaccount`` and their namespace's labels as
    ``io.cilium.k8s.namespace.labels.<key>``. A pod whose ``node`` is another node than the
    proxy's (``$NODE_NAME``) is a peer: selectable by ``toEndpoints``, never policed here."""
    try:
        doc = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise PolicyError(f"pods file {path}: cannot read: {exc}") from None
    if not isinstance(doc, dict):
        raise PolicyError(f"pods file {path}: expected a mapping with a pods list")
    namespaces: dict[str, dict[str, str]] = {}
    for i, raw in enumerate(doc.get("namespaces") or []):
        if not isinstance(raw, dict) or not raw.get("name") or not isinstance(raw.get("labels") or {}, dict):
            raise PolicyError(f"pods file {path}: namespaces[{i}]: expected a mapping with name (and labels)")
        namespaces[str(raw["name"])] = {str(k): str(v) for k, v in (raw.get("labels") or {}).items()}
    pods = []
    for i, raw in enumerate(doc.get("pods") or []):
        where = f"pods file {path}: pods[{i}]"
        if not isinstance(raw, dict) or not raw.get("name"):
            raise PolicyError(f"{where}: expected a mapping with name")
        ips = []
        for ip in raw.get("ips") or []:
            try:
                ips.append(str(ipaddress.ip_address(str(ip))))
            except ValueError:
                raise PolicyError(f"{where}.ips: {ip!r} is not an address (CIDRs are not pods here)") from None
        if not isinstance(raw.get("labels") or {}, dict):
            raise PolicyError(f"{where}.labels: expected a mapping of label to value")
        namespace = str(raw.get("namespace") or "default")
        labels = {str(k): str(v) for k, v in (raw.get("labels") or {}).items()}
        labels.update(cilium_labels(namespaces.get(namespace, {}), str(raw.get("service_account") or "default")))
        pods.append(Pod(str(raw["name"]), namespace, labels, tuple(ips), str(raw.get("node") or "")))
    return pods


def cilium_labels(namespace_labels: Mapping[str, str], service_account: str) -> dict[str, str]:
    """The labels Cilium adds to every endpoint from its namespace and ServiceAccount."""
    out = {NAMESPACE_LABELS_PREFIX + k: v for k, v in namespace_labels.items()}
    out[SERVICE_ACCOUNT_LABEL] = service_account
    return out


class _Identity:
    """One label set and the addresses of the pods that have it."""

    __slots__ = ("labels", "addresses", "pods", "selected_by")

    def __init__(self, labels: dict[str, str]) -> None:
        self.labels = labels
        self.addresses: dict[str, int] = {}  # address -> pods of this identity holding it
        self.pods = 0
        self.selected_by: set[Selector] = set()


class EndpointIndex:
    """Every known pod (every node's) by identity, and what each ``toEndpoints`` selector selects.

    Cilium resolves ``toEndpoints`` against every identity of the cluster; so does this, but
    one pod at a time: a pod that appears, goes or changes labels or addresses touches its
    identity only, and is matched against the selectors in use only when its identity is new
    (replicas share one), never all pods against all selectors. A selector is matched against
    every identity once, when first asked for. :attr:`version` moves when an address a
    selector in use selects appears or goes, so the datapath loader knows when to recompute.
    Safe to update from informer threads while the proxy's loop reads.
    """

    def __init__(self, pods: Iterable[Pod] = ()) -> None:
        self._lock = threading.Lock()
        self._pods: dict[str, tuple[Labels, tuple[str, ...]]] = {}
        self._identities: dict[Labels, _Identity] = {}
        self._selections: dict[Selector, set[Labels]] = {}
        self._version = 0
        for pod in pods:
            self.upsert(pod.key, pod.identity(), pod.ips)

    @property
    def version(self) -> int:
        return self._version

    def __len__(self) -> int:
        return len(self._pods)

    def identities(self) -> int:
        return len(self._identities)

    def upsert(self, key: str, labels: Labels, ips: tuple[str, ...]) -> None:
        """Add or change the pod ``key`` (``labels``: its identity, see :meth:`Pod.identity`)."""
        with self._lock:
            old = self._pods.get(key)
            if old == (labels, ips):
                return
            self._pods[key] = (labels, ips)
            self._attach(labels, ips)  # before detaching: an unchanged address never blinks
            if old is not None:
                self._detach(*old)

    def remove(self, key: str) -> None:
        with self._lock:
            old = self._pods.pop(key, None)
            if old is not None:
                self._detach(*old)

    def addresses(self, selector: Selector) -> set[str]:
        """The addresses of every pod ``selector`` selects."""
        with self._lock:
            chosen = self._selections.get(selector)
            if chosen is None:
                chosen = {k for k, ident in self._identities.items() if selector.matches(ident.labels)}
                for k in chosen:
                    self._identities[k].selected_by.add(selector)
                self._selections[selector] = chosen
            out: set[str] = set()
            for k in chosen:
                out.update(self._identities[k].addresses)
            return out

    def retain(self, selectors: set[Selector]) -> None:
        """Forget the selections of selectors no policy uses any more."""
        with self._lock:
            for sel in [s for s in self._selections if s not in selectors]:
                for k in self._selections.pop(sel):
                    self._identities[k].selected_by.discard(sel)

    def _attach(self, labels: Labels, ips: tuple[str, ...]) -> None:
        ident = self._identities.get(labels)
        if ident is None:
            ident = self._identities[labels] = _Identity(dict(labels))
            for sel, chosen in self._selections.items():
                if sel.matches(ident.labels):
                    chosen.add(labels)
                    ident.selected_by.add(sel)
        ident.pods += 1
        for ip in ips:
            held = ident.addresses.get(ip, 0)
            ident.addresses[ip] = held + 1
            if not held and ident.selected_by:
                self._version += 1

    def _detach(self, labels: Labels, ips: tuple[str, ...]) -> None:
        ident = self._identities[labels]
        for ip in ips:
            held = ident.addresses[ip] - 1
            if held:
                ident.addresses[ip] = held
            else:
                del ident.addresses[ip]
                if ident.selected_by:
                    self._version += 1
        ident.pods -= 1
        if not ident.pods:
            del self._identities[labels]
            for sel in ident.selected_by:
                self._selections[sel].discard(labels)


@dataclass(frozen=True, slots=True)
class CidrEntry:
    network: IPNetwork
    l4: L4 | None  # None: a hole (no rule allows it)


class PolicySet:
    """Policies and pods, with the questions the proxy and the datapath ask answered.

    ``pods`` may hold every node's pods: those on ``node`` (all, when either names no node)
    are this node's, policed when a policy selects them; the others are peers, which only
    ``toEndpoints`` selects. ``endpoints`` is the cluster's index when the caller keeps one
    current (``--kube``); by default it is built from ``pods``.
    """

    def __init__(self, policies: list[Policy], pods: list[Pod], *, node: str = "",
                 endpoints: EndpointIndex | None = None) -> None:
        self.policies = policies
        self.node = node
        self.pods = [p for p in pods if p.on_node(node)]
        self.endpoints = endpoints if endpoints is not None else EndpointIndex(pods)
        self._by_ip = {ip: pod for pod in self.pods for ip in pod.ips}
        self._rules: dict[str, list[EgressRule]] = {}
        self._policed: set[str] = set()
        # Replicas share their rules, so their entries: computed once per rule list and
        # endpoint index version.
        self._cidr_cache: dict[tuple[tuple[EgressRule, ...], int], list[CidrEntry]] = {}
        for pod in self.pods:
            rules: list[EgressRule] = []
            for pol in policies:
                if pol.selects(pod):
                    rules.extend(pol.egress)
                    if pol.polices_egress:
                        self._policed.add(pod.key)
            self._rules[pod.key] = rules

    def pod_by_ip(self, ip: str) -> Pod | None:
        return self._by_ip.get(ip)

    def is_policed(self, pod: Pod) -> bool:
        return pod.key in self._policed

    def policed_pods(self) -> list[Pod]:
        return [p for p in self.pods if p.key in self._policed]

    def rules_for(self, pod: Pod) -> list[EgressRule]:
        return self._rules.get(pod.key, [])

    def dns_allowed(self, pod: Pod, qname: str) -> bool:
        """Whether a rules.dns pattern of the pod's policies allows resolving ``qname``."""
        return any(s.matches(qname) for r in self.rules_for(pod) for s in r.dns_selectors())

    def fqdn_l4(self, pod: Pod, qname: str) -> L4 | None:
        """Ports an answer for ``qname`` opens to its IPs (None: no toFQDNs rule matches)."""
        return L4.union(r.l4() for r in self.rules_for(pod) if any(s.matches(qname) for s in r.to_fqdns))

    def endpoint_selectors(self) -> set[Selector]:
        """Every ``toEndpoints`` selector of a policed pod's rules (what the index must resolve)."""
        return {sel for key in self._policed for r in self._rules[key] for sel in r.to_endpoints}

    def cidr_entries(self, pod: Pod) -> list[CidrEntry]:
        """The pod's toCIDR/toCIDRSet/toEndpoints (and L3-less toPorts) as longest-prefix entries.

        Each entry's ports are the union of every rule that covers the whole prefix without
        excepting it, so the longest match alone decides, as the kernel's LPM lookup does.
        ``toEndpoints`` addresses (every node's pods) are host prefixes, checked by set
        membership, so a selector of thousands of pods costs linear time, not quadratic.
        """
        key = (tuple(self.rules_for(pod)), self.endpoints.version)
        entries = self._cidr_cache.get(key)
        if entries is None:
            if len(self._cidr_cache) > 256:  # entries of earlier index versions are stale anyway
                self._cidr_cache.clear()
            entries = self._cidr_cache[key] = _cidr_entries(key[0], self.endpoints)
        return entries


def _cidr_entries(rules: tuple[EgressRule, ...], endpoints: EndpointIndex) -> list[CidrEntry]:
    # Endpoint addresses stay strings here (hashing and building ipaddress objects is what
    # would cost at thousands of peers); only CIDRs are networks.
    per_rule: list[tuple[list[CidrRule], set[str], L4]] = []
    for rule in rules:
        nets: list[CidrRule] = list(rule.to_cidrs)
        hosts: set[str] = set()
        for sel in rule.to_endpoints:
            hosts |= endpoints.addresses(sel)
        if not rule.to_fqdns and not rule.to_endpoints and not rule.to_cidrs and rule.to_ports:
            # Only ports: any destination on those ports (the DNS rule itself usually).
            nets = [CidrRule(ipaddress.ip_network("0.0.0.0/0")), CidrRule(ipaddress.ip_network("::/0"))]
        if nets or hosts:
            per_rule.append((nets, hosts, rule.l4()))
    networks = {n for nets, _, _ in per_rule for c in nets for n in (c.network, *c.excepts)}
    # A /32 or /128 CIDR and an endpoint address of the same value are one entry.
    host_networks = {str(n.network_address): n for n in networks if n.prefixlen == n.max_prefixlen}
    addresses = set().union(*(hosts for _, hosts, _ in per_rule)) - host_networks.keys()
    with_nets = [(nets, hosts, l4) for nets, hosts, l4 in per_rule if nets]
    entries = []
    for prefix in networks:
        host = host_networks.get(str(prefix.network_address)) is prefix
        covering = [l4 for nets, hosts, l4 in per_rule
                    if (host and str(prefix.network_address) in hosts)
                    or any(_within(prefix, c.network) and not any(_within(prefix, e) for e in c.excepts)
                           for c in nets)]
        entries.append(CidrEntry(prefix, L4.union(covering)))
    for text in addresses:
        net = _host_network(text)
        addr = net.network_address
        covering = [l4 for _, hosts, l4 in per_rule if text in hosts]
        covering += [l4 for nets, hosts, l4 in with_nets if text not in hosts
                     and any(addr in c.network and not any(addr in e for e in c.excepts) for c in nets)]
        entries.append(CidrEntry(net, covering[0] if len(covering) == 1 else L4.union(covering)))
    entries.sort(key=lambda e: (e.network.version, e.network.prefixlen, int(e.network.network_address)))
    return entries


@functools.lru_cache(maxsize=1 << 17)
def _host_network(ip: str) -> IPNetwork:
    return ipaddress.ip_network(ip)


def _within(inner: IPNetwork, outer: IPNetwork) -> bool:
    return inner.version == outer.version and inner.subnet_of(outer)  # type: ignore[arg-type]  # ip_network() is IPv4Network | IPv6Network; the versions are compared first
