{{/* Names */}}
{{- define "np.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "np.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "np.labels" -}}
app.kubernetes.io/name: {{ include "np.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "np.selectorLabels" -}}
app.kubernetes.io/name: {{ include "np.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: node-agent
{{- end -}}

{{- define "np.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "np.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "np.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* The port of a bind address ("8163", ":8163", "0.0.0.0:8163") */}}
{{- define "np.port" -}}
{{- regexFind "[0-9]+$" (toString .) -}}
{{- end -}}

{{/* Seconds the kubelet waits after SIGTERM: each process stops within
     --shutdown-timeout; the margin covers interpreter exit and log flushing. */}}
{{- define "np.terminationGracePeriod" -}}
{{- add (int (ceil .Values.nodeAgent.shutdownTimeout)) 5 -}}
{{- end -}}

{{/* The flags every node process gets (each uses what concerns it), with the
     reference agent's names. Integers go through int64: Helm reads numbers as floats
     and would print large ones in exponent form. */}}
{{- define "np.args" -}}
- --enable-network-policy={{ .Values.enableNetworkPolicy }}
- --enable-policy-event-logs={{ .Values.nodeAgent.enablePolicyEventLogs }}
- --enable-cloudwatch-logs={{ .Values.nodeAgent.enableCloudWatchLogs }}
- --enable-ipv6={{ .Values.nodeAgent.enableIpv6 }}
- --log-level={{ .Values.nodeAgent.logLevel }}
- --log-file={{ .Values.nodeAgent.networkPolicyAgentLogFileLocation }}
- --conntrack-cache-cleanup-period={{ int64 .Values.nodeAgent.conntrackCacheCleanupPeriod }}
- --conntrack-cache-table-size={{ int64 .Values.nodeAgent.conntrackCacheTableSize }}
- --metrics-bind-addr={{ .Values.nodeAgent.metricsBindAddr }}
- --health-probe-bind-addr={{ .Values.nodeAgent.healthProbeBindAddr }}
- --pod-interface-prefixes={{ .Values.nodeAgent.podInterfacePrefixes }}
- --bpf-pin-root={{ .Values.nodeAgent.bpfPinRoot }}
- --runtime-dir={{ .Values.nodeAgent.runtimeDir }}
- --shutdown-timeout={{ .Values.nodeAgent.shutdownTimeout }}
- --flow-log-format={{ .Values.nodeAgent.flowLogFormat }}
- --flow-log-max-bytes={{ int64 .Values.nodeAgent.flowLogMaxBytes }}
- --flow-log-backups={{ int64 .Values.nodeAgent.flowLogBackups }}
- --cloudwatch-queue-size={{ int64 .Values.nodeAgent.cloudwatchQueueSize }}
- --cni-answer-timeout={{ .Values.nodeAgent.cniAnswerTimeout }}
- --fqdn-ttl-grace={{ .Values.nodeAgent.fqdnTtlGrace }}
- --dns-proxy-port={{ int64 .Values.nodeAgent.dnsProxyPort }}
{{- if .Values.nodeAgent.clusterDNS }}
- --cluster-dns={{ .Values.nodeAgent.clusterDNS }}
{{- end }}
{{- if .Values.eks.enabled }}
- --npa-socket={{ .Values.eks.runDir }}/npa.sock
- --ipamd-socket={{ .Values.eks.runDir }}/ipamd.sock
{{- end }}
{{- end -}}

{{- define "np.env" -}}
- name: MY_NODE_NAME
  valueFrom:
    fieldRef:
      fieldPath: spec.nodeName
- name: NETWORK_POLICY_ENFORCING_MODE
  value: {{ .Values.nodeAgent.enforcingMode | quote }}
{{- end -}}

{{/* A container's securityContext: root (the local sockets and bpffs are root's), no
     privilege escalation, a read-only root filesystem, and only the given capabilities. */}}
{{- define "np.securityContext" -}}
privileged: false
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsUser: 0
runAsNonRoot: false
seccompProfile:
  type: RuntimeDefault
capabilities:
  drop: [ALL]
  add: {{ toJson . }}
{{- end -}}
