{{/* Name of the chart, used in labels. */}}
{{- define "kuberft.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Full name of the release's objects: the release name, plus the chart name unless it contains it. */}}
{{- define "kuberft.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Labels of every object of the release. */}}
{{- define "kuberft.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "kuberft.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kuberft
{{- end -}}

{{/* The operator's pods (Deployment selector, Service, ServiceMonitor). */}}
{{- define "kuberft.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kuberft.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{/* Labels of the operator's own objects (Deployment, Service, ServiceAccount, RBAC). */}}
{{- define "kuberft.operatorLabels" -}}
{{ include "kuberft.labels" . }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "kuberft.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "kuberft.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "kuberft.leaseName" -}}
{{- default (include "kuberft.fullname" .) .Values.operator.leaderElection.leaseName -}}
{{- end -}}

{{/*
Image reference of one component: (dict "root" $ "component" "trainer").
<repository or registry/component>@<digest>, else :<tag or images.tag or appVersion>.
*/}}
{{- define "kuberft.image" -}}
{{- $images := .root.Values.images -}}
{{- $image := index $images .component -}}
{{- $repository := default (printf "%s/%s" (trimSuffix "/" $images.registry) .component) $image.repository -}}
{{- if $image.digest -}}
{{- printf "%s@%s" $repository $image.digest -}}
{{- else -}}
{{- printf "%s:%s" $repository (default (default .root.Chart.AppVersion $images.tag) $image.tag) -}}
{{- end -}}
{{- end -}}

{{/* The namespaces the operator reconciles (empty with watchAllNamespaces: all of them). */}}
{{- define "kuberft.watchedNamespaces" -}}
{{- if and .Values.watchAllNamespaces .Values.watchNamespaces -}}
{{- fail "watchAllNamespaces reconciles every namespace: leave watchNamespaces empty with it" -}}
{{- end -}}
{{- if .Values.watchAllNamespaces -}}
{{- toJson list -}}
{{- else -}}
{{- toJson (.Values.watchNamespaces | default (list .Release.Namespace)) -}}
{{- end -}}
{{- end -}}

{{/* Namespaces that get the reward-pool NetworkPolicy. */}}
{{- define "kuberft.rewardPolicyNamespaces" -}}
{{- $namespaces := .Values.rewardSandbox.networkPolicy.namespaces | default .Values.watchNamespaces | default (list .Release.Namespace) -}}
{{- toJson $namespaces -}}
{{- end -}}

{{/*
The rules of the operator's (Cluster)Role: exactly what kuberft_operator.controller.RBAC_RULES
lists except the Lease, which is granted in the release namespace only (leader-election Role).
*/}}
{{- define "kuberft.operatorRules" -}}
- apiGroups: [kuberft.io]
  resources: [rftjobs, turbodeployments]
  verbs: [get, list, watch]
- apiGroups: [kuberft.io]
  resources: [rftjobs/status, turbodeployments/status]
  verbs: [patch]
- apiGroups: [""]
  resources: [configmaps]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [""]
  resources: [services, serviceaccounts]
  verbs: [list, watch, create, patch, delete]
- apiGroups: [""]
  resources: [persistentvolumeclaims]
  verbs: [list, watch, create, patch]
- apiGroups: [""]
  resources: [pods]
  verbs: [list, watch]
- apiGroups: [""]
  resources: [events]
  verbs: [create, list]
- apiGroups: [apps]
  resources: [deployments]
  verbs: [list, watch, create, patch, delete]
- apiGroups: [batch]
  resources: [jobs]
  verbs: [list, watch, create, delete]
- apiGroups: [networking.k8s.io]
  resources: [networkpolicies]
  verbs: [list, watch, create, patch, delete]
- apiGroups: [rbac.authorization.k8s.io]
  resources: [roles, rolebindings]
  verbs: [list, watch, create, patch, delete]
- apiGroups: [autoscaling]
  resources: [horizontalpodautoscalers]
  verbs: [list, watch, create, patch, delete]
- apiGroups: [jobset.x-k8s.io]
  resources: [jobsets]
  verbs: [list, watch, create, delete]
- apiGroups: [kueue.x-k8s.io]
  resources: [localqueues]
  verbs: [get]
{{- end -}}
